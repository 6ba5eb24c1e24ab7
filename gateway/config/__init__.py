"""Configuration: the gateway.yaml schema and its loader."""

from gateway.config.loader import ConfigError, load_config
from gateway.config.routes import RouteConfig
from gateway.config.schema import GatewayConfig

__all__ = ["ConfigError", "GatewayConfig", "RouteConfig", "load_config"]
