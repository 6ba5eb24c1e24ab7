-- Every limit of one request, decided atomically: admit only if all admit; a refusal consumes none.
-- The same sliding sub-window algorithm as gateway/ratelimit/memory.py (see policy.py).
-- KEYS[i]: one hash per counter, all sharing a hash tag. Its fields: one per live sub-window
--   (index = count), and three that sum them up, so that the common decision reads those, not
--   every sub-window: '-1' (the total of the sub-windows), '-2' (the oldest index) and '-3' (the
--   newest). The whole hash is read only when a sub-window has aged out (once per sub-window width
--   at most), when they are missing (a new counter), or for the retry time of a limit that refuses.
--   A hit goes to the newest sub-window when the clock says an older one (it stepped back), as in
--   memory.py: counted late, its slot frees late, never early.
--   They are negative numbers on purpose: the previous version of this script, which a gateway not
--   yet upgraded may still run against the same counters, reads them as aged-out sub-windows and
--   deletes them (this one then rebuilds them) instead of failing on a field that is not a number.
-- ARGV: buckets, cost, now_ms (0: use the server's TIME, never a replica's clock),
--       then per key: count, period_s, width_ms.
local buckets = tonumber(ARGV[1])
local cost = tonumber(ARGV[2])
local now = tonumber(ARGV[3])
if now == 0 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- The live sub-windows of a counter, oldest first, their total, and the aged-out fields.
local function read_all(key, floor_index)
  local raw = redis.call('HGETALL', key)
  local list, stale, total = {}, {}, 0
  for j = 1, #raw, 2 do
    local b = tonumber(raw[j])
    if b ~= nil and b >= 0 then  -- a sub-window, not one of the summary fields
      if b < floor_index then
        stale[#stale + 1] = raw[j]
      else
        total = total + tonumber(raw[j + 1])
        list[#list + 1] = {b, tonumber(raw[j + 1])}
      end
    end
  end
  table.sort(list, function(a, b) return a[1] < b[1] end)
  return list, total, stale, #raw
end

-- As read_all, with the aged-out sub-windows deleted and the summary fields written.
local function rebuild(key, floor_index)
  local list, total, stale, fields = read_all(key, floor_index)
  if #list == 0 then
    if fields > 0 then redis.call('DEL', key) end
    return list, 0, nil, nil
  end
  if #stale > 0 then redis.call('HDEL', key, unpack(stale)) end
  redis.call('HSET', key, '-1', total, '-2', list[1][1], '-3', list[#list][1])
  return list, total, list[1][1], list[#list][1]
end

local n = #KEYS
local totals, oldests, newests, indexes, lists = {}, {}, {}, {}, {}
local allowed = 1
for i = 1, n do
  local count = tonumber(ARGV[1 + i * 3])
  local width = tonumber(ARGV[3 + i * 3])
  local index = math.floor(now / width)
  local floor_index = index - buckets
  local kept = redis.call('HMGET', KEYS[i], '-1', '-2', '-3')
  local total, oldest, newest = tonumber(kept[1]), tonumber(kept[2]), tonumber(kept[3])
  if total == nil or oldest == nil or newest == nil or oldest < floor_index then
    lists[i], total, oldest, newest = rebuild(KEYS[i], floor_index)
  end
  totals[i], oldests[i], newests[i], indexes[i] = total, oldest, newest, index
  if total + cost > count then allowed = 0 end
end

local out = {allowed, now}
for i = 1, n do
  local count = tonumber(ARGV[1 + i * 3])
  local period = tonumber(ARGV[2 + i * 3])
  local width = tonumber(ARGV[3 + i * 3])
  local total, oldest, newest, index = totals[i], oldests[i], newests[i], indexes[i]
  local retry = 0
  if allowed == 1 then
    if newest ~= nil and newest > index then index = newest end
    redis.call('HINCRBY', KEYS[i], index, cost)
    redis.call('HINCRBY', KEYS[i], '-1', cost)
    if oldest == nil then
      oldest = index
      redis.call('HSET', KEYS[i], '-2', index, '-3', index)
    elseif index > newest then
      redis.call('HSET', KEYS[i], '-3', index)
    end
    -- Renewed on every admission: a counter outlives its newest sub-window even if Redis's clock
    -- steps back (an expiry set only when a sub-window opens could then end too early).
    redis.call('PEXPIRE', KEYS[i], period * 1000 + 2 * width)
    total = total + cost
  elseif total + cost > count then
    -- The first moment enough old sub-windows have left the window for this request to fit.
    local list = lists[i] or read_all(KEYS[i], index - buckets)  -- a refusal writes nothing
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
