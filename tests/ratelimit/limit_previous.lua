-- Every limit of one request, decided atomically: admit only if all admit; a refusal consumes none.
-- The same sliding sub-window algorithm as gateway/ratelimit/memory.py (see policy.py).
-- KEYS[i]: one hash per counter (field = sub-window index, value = count); all share a hash tag.
-- ARGV: buckets, cost, now_ms (0: use the server's TIME, never a replica's clock),
--       then per key: count, period_s, width_ms.
local buckets = tonumber(ARGV[1])
local cost = tonumber(ARGV[2])
local now = tonumber(ARGV[3])
if now == 0 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local n = #KEYS
local totals, oldests, indexes, entries = {}, {}, {}, {}
local allowed = 1
for i = 1, n do
  local count = tonumber(ARGV[1 + i * 3])
  local width = tonumber(ARGV[3 + i * 3])
  local index = math.floor(now / width)
  local floor_index = index - buckets
  local raw = redis.call('HGETALL', KEYS[i])
  local total, list, stale = 0, {}, {}
  for j = 1, #raw, 2 do
    local b = tonumber(raw[j])
    local c = tonumber(raw[j + 1])
    if b < floor_index then
      stale[#stale + 1] = raw[j]
    else
      total = total + c
      list[#list + 1] = {b, c}
    end
  end
  if #stale > 0 then redis.call('HDEL', KEYS[i], unpack(stale)) end
  table.sort(list, function(a, b) return a[1] < b[1] end)
  totals[i], indexes[i], entries[i] = total, index, list
  if total + cost > count then allowed = 0 end
end
local out = {allowed, now}
for i = 1, n do
  local count = tonumber(ARGV[1 + i * 3])
  local period = tonumber(ARGV[2 + i * 3])
  local width = tonumber(ARGV[3 + i * 3])
  local total, list = totals[i], entries[i]
  if allowed == 1 then
    redis.call('HINCRBY', KEYS[i], indexes[i], cost)
    redis.call('PEXPIRE', KEYS[i], period * 1000 + 2 * width)
    total = total + cost
    if #list == 0 or list[#list][1] ~= indexes[i] then list[#list + 1] = {indexes[i], cost} end
  end
  local remaining = count - total
  if remaining < 0 then remaining = 0 end
  local reset = 0
  if #list > 0 then reset = (list[1][1] + buckets + 1) * width - now end
  local retry = 0
  if allowed == 0 and total + cost > count then
    local need = total + cost - count
    local freed = 0
    retry = period * 1000
    for j = 1, #list do
      freed = freed + list[j][2]
      if freed >= need then
        retry = (list[j][1] + buckets + 1) * width - now
        break
      end
    end
  end
  out[#out + 1] = remaining
  out[#out + 1] = reset
  out[#out + 1] = retry
end
return out
