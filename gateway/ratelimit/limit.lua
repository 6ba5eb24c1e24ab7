-- Every limit of one request, decided atomically: admit only if all admit; a refusal consumes none.
-- The same sliding sub-window algorithm as gateway/ratelimit/memory.py (see policy.py).
-- KEYS[i]: one hash per counter, all sharing a hash tag. Its fields: one per live sub-window
--   (index = count), and 't' (the sum of those counts) and 'o' (the oldest index), so that the common
--   decision reads two fields, not every sub-window: the whole hash is read only when a sub-window
--   has aged out (once per sub-window width at most), when 't' or 'o' is missing (a new counter, or
--   one written before they existed), or to compute the retry time of a limit that refuses.
-- ARGV: buckets, cost, now_ms (0: use the server's TIME, never a replica's clock),
--       then per key: count, period_s, width_ms.
local buckets = tonumber(ARGV[1])
local cost = tonumber(ARGV[2])
local now = tonumber(ARGV[3])
if now == 0 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- The live sub-windows of a counter, oldest first; stale ones deleted, 't' and 'o' rewritten.
local function rebuild(key, floor_index)
  local raw = redis.call('HGETALL', key)
  local list, stale, total = {}, {}, 0
  for j = 1, #raw, 2 do
    local f = raw[j]
    if f ~= 't' and f ~= 'o' then
      local b = tonumber(f)
      if b < floor_index then
        stale[#stale + 1] = f
      else
        local c = tonumber(raw[j + 1])
        total = total + c
        list[#list + 1] = {b, c}
      end
    end
  end
  if #list == 0 then
    if #raw > 0 then redis.call('DEL', key) end
    return list, 0, nil
  end
  if #stale > 0 then redis.call('HDEL', key, unpack(stale)) end
  table.sort(list, function(a, b) return a[1] < b[1] end)
  redis.call('HSET', key, 't', total, 'o', list[1][1])
  return list, total, list[1][1]
end

local n = #KEYS
local totals, oldests, indexes, lists = {}, {}, {}, {}
local allowed = 1
for i = 1, n do
  local count = tonumber(ARGV[1 + i * 3])
  local width = tonumber(ARGV[3 + i * 3])
  local index = math.floor(now / width)
  local floor_index = index - buckets
  local kept = redis.call('HMGET', KEYS[i], 't', 'o')
  local total, oldest = tonumber(kept[1]), tonumber(kept[2])
  if total == nil or oldest == nil or oldest < floor_index then
    lists[i], total, oldest = rebuild(KEYS[i], floor_index)
  end
  totals[i], oldests[i], indexes[i] = total, oldest, index
  if total + cost > count then allowed = 0 end
end

local out = {allowed, now}
for i = 1, n do
  local count = tonumber(ARGV[1 + i * 3])
  local period = tonumber(ARGV[2 + i * 3])
  local width = tonumber(ARGV[3 + i * 3])
  local total, oldest, index = totals[i], oldests[i], indexes[i]
  local retry = 0
  if allowed == 1 then
    local in_window = redis.call('HINCRBY', KEYS[i], index, cost)
    redis.call('HINCRBY', KEYS[i], 't', cost)
    if oldest == nil or index < oldest then
      oldest = index
      redis.call('HSET', KEYS[i], 'o', index)
    end
    -- The newest sub-window is counted until (index + buckets + 1) * width: an expiry set when it
    -- opens, a period and two widths on, outlives it, so later hits in it need not renew it.
    if in_window == cost then redis.call('PEXPIRE', KEYS[i], period * 1000 + 2 * width) end
    total = total + cost
  elseif total + cost > count then
    -- The first moment enough old sub-windows have left the window for this request to fit.
    local list = lists[i] or rebuild(KEYS[i], index - buckets)
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
  local remaining = count - total
  if remaining < 0 then remaining = 0 end
  local reset = 0
  if oldest ~= nil then reset = (oldest + buckets + 1) * width - now end
  out[#out + 1] = remaining
  out[#out + 1] = reset
  out[#out + 1] = retry
end
return out
