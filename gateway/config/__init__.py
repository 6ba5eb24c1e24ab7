"""Configuration: the gateway.yaml schema and its loader."""

from gateway.config.loader import ConfigError, load_config
from gateway.config.schema import GatewayConfig, RouteConfig

__all__ = ["ConfigError", "GatewayConfig", "RouteConfig", "load_config"]
