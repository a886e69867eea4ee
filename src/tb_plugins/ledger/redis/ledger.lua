-- The Redis ledger of tb_plugins: every operation in one script, chosen by ARGV[1].
--
-- One script (one SHA, loaded once per server) keeps the helpers shared by reserve, settle,
-- release and status in one place; each call is still one EVALSHA: one round trip, run
-- atomically by Redis, all lines or none.
--
-- ARGV[2] is the ledger's key prefix "{tb:<namespace>}". Every key below starts with it, so
-- every key of one ledger has the same hash tag and lives in the same Redis Cluster slot: the
-- keys a script derives (a line's hash, a reservation's lines) are in the slot of KEYS[1], as
-- a cluster requires.
--
-- Keys (<lk> is tb_plugins.ledger.base.line_key, percent-escaped: no ':', '{', '}', space or
-- newline):
--   P:l:<lk>     hash, everything about one line (one scope in one window):
--                  C       settled spend: entries (bucket, 6 amounts), by bucket
--                  H       the held counter: entries (bucket, count, 6 amounts) summing the
--                          live holds of each bucket
--                  r<rid>  the hold of reservation <rid>: (bucket, expires_at, 6 amounts)
--                  n       no hold of the line expires before this (epoch seconds)
--                  t       the key's TTL was last set to last until this
--                (all packed little-endian doubles, struct "<d…")
--   P:r:<rid>    the line keys <rid> holds on, one per line of text
--   P:s:<rid>    the token of the settle call that settled <rid> (idempotency; expires after
--                the settled TTL): a call sent again after its reply was lost finds its own
--                token and still says applied, a second settle call of <rid> does not
--   P:lines      zset <lk> -> when its newest bucket stops being read (+inf: never)
--   P:seq        counter giving usage records a unique, ordered id
--   P:log:<day>  zset "<16 hex digits of id><record JSON>" -> ts, one per UTC day
--   P:logdays    zset <day> -> the day's start (epoch seconds)
--
-- Reading a line is one HMGET of five fields, whatever its window: a rolling window's buckets
-- are entries of C, not keys or fields of their own.
--
-- Which holds count: settled spend counts in the buckets low..bucket of the line's window. On
-- a line that sums one bucket (calendar, total) a hold counts in the bucket it was made in; on
-- a rolling line (low < bucket) every live hold counts, whatever bucket it was made in (a call
-- may run longer than the window: its hold counts until it is settled, released or expired).
--
-- Expiry of holds: "n" is a lower bound of the expiries of a line's holds, so while now < n
-- no hold has expired and nothing is scanned. Once now >= n the line's holds are scanned, each
-- expired one is deleted and its amounts subtracted from the held counter H, and n moves to
-- the earliest expiry left. An expired hold really returns its amount, for one scan of the
-- line's live holds per hold lifetime instead of a sorted-set update per hold.
--
-- Arithmetic is on Lua numbers (doubles): exact up to 2^53 per sum (9e15 tokens, or $9M in
-- nano-dollars per line and window), rounded to a few units beyond. States go back to the
-- client as little-endian int64s (struct "<l…"), which it reads without a float conversion;
-- a state that an int64 cannot hold fails the call with "amount out of range" before it
-- writes anything (the client refuses amounts above 2^53 before sending them).

local op = ARGV[1]
local P = ARGV[2]
local HOLD_SLACK = 1800 -- refresh a line's TTL only when this much less than needed is left
local COUNTER_SLACK = 3600
local INF = 1 / 0
local C_WIDTH, H_WIDTH = 7, 8 -- doubles per entry of C and of H

local formats = {}
local function fmt(n)
  local f = formats[n]
  if not f then
    f = '<' .. string.rep('d', n)
    formats[n] = f
  end
  return f
end

-- Packed doubles <-> a flat Lua list.
local function unpacked(s)
  if not s or s == '' then
    return {}
  end
  local v = {struct.unpack(fmt(#s / 8), s)}
  v[#v] = nil -- struct.unpack returns the next position last
  return v
end

local function packed(v)
  return struct.pack(fmt(#v), unpack(v))
end

local iformats = {}
local INT64 = 2 ^ 63
-- Whole numbers (states) as little-endian int64s; a value an int64 cannot hold is an error
-- (a C cast would wrap it around silently).
local function ints(v)
  local n = #v
  for i = 1, n do
    local x = v[i]
    if not (x > -INT64 and x < INT64) then
      error({err = 'amount out of range: a sum of ' .. string.format('%.17g', x) ..
        ' does not fit in 64 bits'})
    end
  end
  local f = iformats[n]
  if not f then
    f = '<' .. string.rep('l', n)
    iformats[n] = f
  end
  return struct.pack(f, unpack(v))
end

local function num(s)
  if not s then
    return nil
  end
  return (struct.unpack('<d', s))
end

-- Add `delta` (w - 1 values) to the entry of bucket `b` in the sorted flat list `flat` of
-- entries of width `w`, creating it if needed; drop entries older than `keep_from`, and
-- entries whose first value falls to 0 or below when `by_count` is set. Returns the new list
-- (`flat` itself, changed in place, in the usual cases: the bucket is the newest or new).
local function upsert(flat, w, b, delta, keep_from, by_count)
  local n = #flat
  if n == 0 or flat[1] >= keep_from then
    local last = n - w + 1
    if n > 0 and flat[last] == b then
      for j = 1, w - 1 do flat[last + j] = flat[last + j] + delta[j] end
      if by_count and flat[last + 1] <= 0 then
        for j = n, last, -1 do flat[j] = nil end
      end
      return flat
    end
    if n == 0 or flat[last] < b then
      if not (by_count and delta[1] <= 0) then
        flat[n + 1] = b
        for j = 1, w - 1 do flat[n + 1 + j] = delta[j] end
      end
      return flat
    end
  end
  local out, placed = {}, false
  local function push(o, base)
    local first = #out + 1
    out[first] = b
    for j = 1, w - 1 do
      out[first + j] = (base and flat[o + j] or 0) + delta[j]
    end
    if by_count and out[first + 1] <= 0 then
      for j = w - 1, 0, -1 do out[first + j] = nil end
    end
  end
  for o = 1, n, w do
    local eb = flat[o]
    if not placed and eb > b then
      push(nil, false)
      placed = true
    end
    if eb == b then
      push(o, true)
      placed = true
    elseif eb >= keep_from then
      for j = 0, w - 1 do out[#out + 1] = flat[o + j] end
    end
  end
  if not placed then
    push(nil, false)
  end
  return out
end

-- Read a line in one HMGET (its spend, held counter, watermarks and the hold of `rid`).
local function load(lk, bucket, span, width, rid)
  local key = P .. ':l:' .. lk
  local v = redis.call('HMGET', key, 'C', 'H', 'n', 't', 'r' .. (rid or ''))
  return {key = key, lk = lk, bucket = bucket, low = bucket - (span - 1) * width,
    C = unpacked(v[1]), H = unpacked(v[2]), n = num(v[3]) or INF, t = num(v[4]) or -INF,
    own = rid and v[5] and unpacked(v[5]) or false}
end

-- Delete the holds of line `key` that expired at or before `now`, subtracting them from the
-- held counter, and move "n" to the earliest expiry left.
local function purge(key, now)
  local all = redis.call('HGETALL', key)
  local H, dead, next_expiry = {}, {}, INF
  for i = 1, #all, 2 do
    if all[i] == 'H' then
      H = unpacked(all[i + 1])
    end
  end
  for i = 1, #all, 2 do
    if string.sub(all[i], 1, 1) == 'r' then
      local hold = unpacked(all[i + 1])
      if hold[2] <= now then
        dead[#dead + 1] = all[i]
        H = upsert(H, H_WIDTH, hold[1],
          {-1, -hold[3], -hold[4], -hold[5], -hold[6], -hold[7], -hold[8]}, -INF, true)
      elseif hold[2] < next_expiry then
        next_expiry = hold[2]
      end
    end
  end
  local sets = {}
  if #dead > 0 then
    if #H > 0 then
      sets = {'H', packed(H)}
    else
      dead[#dead + 1] = 'H'
    end
  end
  if next_expiry == INF then
    dead[#dead + 1] = 'n'
  else
    sets[#sets + 1] = 'n'
    sets[#sets + 1] = struct.pack('<d', next_expiry)
  end
  if #sets > 0 then redis.call('HSET', key, unpack(sets)) end
  if #dead > 0 then redis.call('HDEL', key, unpack(dead)) end
end

-- Load a line with no expired hold left in it.
local function fresh(lk, bucket, span, width, rid, now)
  local L = load(lk, bucket, span, width, rid)
  if now >= L.n then
    purge(L.key, now)
    L = load(lk, bucket, span, width, rid)
  end
  return L
end

-- Append the line's state to `out`: 6 settled then 6 held amounts over its window, without
-- the loaded reservation's own hold when `exclude` is set. A rolling line (low < bucket)
-- counts every hold of H, whatever its bucket; another line only those of its bucket.
local function state(L, exclude, out)
  local s1, s2, s3, s4, s5, s6 = 0, 0, 0, 0, 0, 0
  local low, high = L.low, L.bucket
  local C = L.C
  for o = 1, #C, C_WIDTH do
    local b = C[o]
    if b >= low and b <= high then
      s1, s2, s3 = s1 + C[o + 1], s2 + C[o + 2], s3 + C[o + 3]
      s4, s5, s6 = s4 + C[o + 4], s5 + C[o + 5], s6 + C[o + 6]
    end
  end
  local h1, h2, h3, h4, h5, h6 = 0, 0, 0, 0, 0, 0
  local H = L.H
  local every = low < high
  for o = 1, #H, H_WIDTH do
    local b = H[o]
    if every or (b >= low and b <= high) then
      h1, h2, h3 = h1 + H[o + 2], h2 + H[o + 3], h3 + H[o + 4]
      h4, h5, h6 = h4 + H[o + 5], h5 + H[o + 6], h6 + H[o + 7]
    end
  end
  local own = L.own
  if exclude and own and (every or (own[1] >= low and own[1] <= high)) then
    h1, h2, h3 = h1 - own[3], h2 - own[4], h3 - own[5]
    h4, h5, h6 = h4 - own[6], h5 - own[7], h6 - own[8]
  end
  local n = #out
  out[n + 1], out[n + 2], out[n + 3], out[n + 4], out[n + 5], out[n + 6] =
    s1, s2, s3, s4, s5, s6
  out[n + 7], out[n + 8], out[n + 9], out[n + 10], out[n + 11], out[n + 12] =
    h1, h2, h3, h4, h5, h6
  return out
end

-- The held counter without `hold` (a flat hold record).
local function without(H, hold)
  return upsert(H, H_WIDTH, hold[1],
    {-1, -hold[3], -hold[4], -hold[5], -hold[6], -hold[7], -hold[8]}, -INF, true)
end

-- Drop the hold of `rid` on line `lk`; true if it was live at `now`.
local function drop(lk, rid, now)
  local key = P .. ':l:' .. lk
  local v = redis.call('HMGET', key, 'r' .. rid, 'H')
  if not v[1] then
    return false
  end
  local hold = unpacked(v[1])
  local H = without(unpacked(v[2]), hold)
  if #H > 0 then
    redis.call('HSET', key, 'H', packed(H))
    redis.call('HDEL', key, 'r' .. rid)
  else
    redis.call('HDEL', key, 'r' .. rid, 'H')
  end
  return hold[2] > now
end

-- Drop every hold of `rid` on the lines listed in `held_on` (text, one per line), except
-- those in `skip`; true if one was live.
local function drop_all(held_on, rid, now, skip)
  local live = false
  if held_on then
    for lk in string.gmatch(held_on, '[^\n]+') do
      if not skip[lk] and drop(lk, rid, now) then
        live = true
      end
    end
  end
  return live
end

-- Make line L's key live at least `ttl` more seconds (a negative ttl: the line never expires).
-- Adds the "t" watermark to `sets` and returns the TTL to set, or nil.
local function keep(L, ttl, slack, now, sets)
  if ttl >= 0 and L.t < now + ttl - slack then
    sets[#sets + 1] = 't'
    sets[#sets + 1] = struct.pack('<d', now + ttl)
    return math.ceil(ttl)
  end
  return nil
end

-- Append one usage record: `member` (JSON) at `ts` (a string: a score keeps all its digits)
-- in the log of `day`, which starts at `day_start`; keep that day `ttl` seconds (< 0: forever).
local function log(member, ts, day, day_start, ttl)
  local seq = redis.call('INCR', P .. ':seq')
  local day_key = P .. ':log:' .. day
  redis.call('ZADD', day_key, ts, string.format('%016x', seq) .. member)
  redis.call('ZADD', P .. ':logdays', day_start, day)
  if ttl >= 0 and redis.call('TTL', day_key) < ttl - 3600 then
    redis.call('EXPIRE', day_key, math.ceil(ttl))
  end
end

-- Numbers travel packed (little-endian doubles) in one argument: exact, and one argument
-- instead of dozens. The line keys follow as arguments of their own.
local function numbers(s)
  return unpacked(s)
end

-- The reply of reserve and settle: {flag, <12 int64s per line read>}.
local function reply(flag, out)
  return {flag, ints(out)}
end

if op == 'reserve' then
  -- ARGV: rid, numbers, lk... ; numbers: now, expires_at, a1..a6, then per line
  -- bucket, span, width, hold_ttl (< 0: never), l1..l6 (< 0: no limit)
  local rid, v = ARGV[3], numbers(ARGV[4])
  local now, expires = v[1], v[2]
  local amount = {v[3], v[4], v[5], v[6], v[7], v[8]}
  local n, stride = #ARGV - 4, 10
  local lines, out, had_hold = {}, {}, false
  for i = 0, n - 1 do
    local at = 9 + i * stride
    local L = fresh(ARGV[5 + i], v[at], v[at + 1], v[at + 2], rid, now)
    lines[i + 1] = L
    had_hold = had_hold or (L.own and true)
    state(L, true, out)
  end
  local ok = 1
  for i = 0, n - 1 do
    for u = 1, 6 do
      local limit = v[9 + i * stride + 3 + u]
      if limit >= 0 then
        local s = i * 12 + u
        if out[s] + out[s + 6] + amount[u] > limit then
          ok = 0
        end
      end
    end
  end
  local states = ints(out) -- before any write: a state out of range writes nothing
  if ok == 0 then
    return {0, states}
  end
  local rk = P .. ':r:' .. rid
  if had_hold then
    -- The id holds already (a retried or downgraded reservation): drop that hold first.
    drop_all(redis.call('GET', rk), rid, now, {})
    for i = 0, n - 1 do
      local at = 9 + i * stride
      lines[i + 1] = load(ARGV[5 + i], v[at], v[at + 1], v[at + 2], false)
    end
  end
  local delta = {1, amount[1], amount[2], amount[3], amount[4], amount[5], amount[6]}
  local held_on, done = {}, {}
  for i = 0, n - 1 do
    local L = lines[i + 1]
    if not done[L.lk] then
      done[L.lk] = true
      local b = L.bucket
      local sets = {
        'H', packed(upsert(L.H, H_WIDTH, b, delta, -INF, true)),
        'r' .. rid, struct.pack('<dddddddd', b, expires, amount[1], amount[2], amount[3],
          amount[4], amount[5], amount[6]),
      }
      if expires < L.n then
        sets[#sets + 1] = 'n'
        sets[#sets + 1] = struct.pack('<d', expires)
      end
      local ttl = keep(L, v[9 + i * stride + 3], HOLD_SLACK, now, sets)
      redis.call('HSET', L.key, unpack(sets))
      if ttl then redis.call('EXPIRE', L.key, ttl) end
      held_on[#held_on + 1] = L.lk
    end
  end
  local old = redis.call('SET', rk, table.concat(held_on, '\n'), 'EX',
    math.max(math.ceil(expires - now), 0) + 3600, 'GET')
  if old and not had_hold then
    -- The id held on other lines (a reservation retried with other scopes): drop those.
    drop_all(old, rid, now, done)
  end
  return {1, states}

elseif op == 'settle' then
  -- ARGV: rid, numbers, member, ts, day, token, lk... ; numbers: now, settled_ttl, a1..a6,
  -- log_ttl (< 0: forever), day_start, then per line: bucket, span, width,
  -- counter_ttl (< 0: never), lines_score, watched (1: read its state back, 0: not)
  local rid, v, token = ARGV[3], numbers(ARGV[4]), ARGV[8]
  local now = v[1]
  local n, stride = #ARGV - 8, 6
  local settled_key = P .. ':s:' .. rid
  local mark = redis.call('GET', settled_key)
  if mark then
    -- Settled before: by this very call (sent again after its reply was lost) it still
    -- counts as applied; by another call, not. Nothing changes either way.
    local out = {}
    for i = 0, n - 1 do
      local at = 11 + i * stride
      if v[at + 5] ~= 0 then
        state(fresh(ARGV[9 + i], v[at], v[at + 1], v[at + 2], false, now), false, out)
      end
    end
    return reply(mark == token and 1 or 0, out)
  end
  -- Read every line and work out its writes first, so that a state out of range (see ints)
  -- fails the settle before anything of it is written.
  local amount = {v[3], v[4], v[5], v[6], v[7], v[8]}
  local writes, out, done, new_bucket = {}, {}, {}, false
  for i = 0, n - 1 do
    local at = 11 + i * stride
    local lk = ARGV[9 + i]
    local L = fresh(lk, v[at], v[at + 1], v[at + 2], rid, now)
    local sets, dels = {}, nil
    if L.own then
      L.H = without(L.H, L.own)
      L.own = false
      if #L.H > 0 then
        sets[1], sets[2] = 'H', packed(L.H)
        dels = {'r' .. rid}
      else
        dels = {'r' .. rid, 'H'}
      end
    end
    done[lk] = true
    local C, b = L.C, L.bucket
    local fresh_bucket = true
    for o = #C - C_WIDTH + 1, 1, -C_WIDTH do
      if C[o] == b then
        fresh_bucket = false
        break
      end
    end
    L.C = upsert(C, C_WIDTH, b, amount, L.low, false)
    sets[#sets + 1] = 'C'
    sets[#sets + 1] = packed(L.C)
    local ttl = keep(L, v[at + 3], COUNTER_SLACK, now, sets)
    writes[#writes + 1] = {L.key, sets, dels, ttl, fresh_bucket and lk, v[at + 4]}
    new_bucket = new_bucket or fresh_bucket
    if v[at + 5] ~= 0 then
      state(L, false, out)
    end
  end
  local states = ints(out)
  redis.call('SET', settled_key, token, 'EX', math.ceil(v[2]))
  for _, w in ipairs(writes) do
    redis.call('HSET', w[1], unpack(w[2]))
    if w[3] then redis.call('HDEL', w[1], unpack(w[3])) end
    if w[4] then redis.call('EXPIRE', w[1], w[4]) end
    if w[5] then
      -- A new bucket: list the line for scopes() until its newest bucket expires.
      redis.call('ZADD', P .. ':lines', 'GT', w[6], w[5])
    end
  end
  drop_all(redis.call('GETDEL', P .. ':r:' .. rid), rid, now, done)
  if new_bucket then
    redis.call('ZREMRANGEBYSCORE', P .. ':lines', '-inf', '(' .. string.format('%.17g', now))
  end
  log(ARGV[5], ARGV[6], ARGV[7], v[10], v[9])
  return {1, states}

elseif op == 'release' then
  -- ARGV: rid, now
  local live = drop_all(redis.call('GETDEL', P .. ':r:' .. ARGV[3]), ARGV[3],
    tonumber(ARGV[4]), {})
  return live and 1 or 0

elseif op == 'forget' then
  -- ARGV: now, rid... : drop every hold of each reservation (ids whose reserve timed out, so
  -- it may have landed unseen); returns how many still held something live.
  local now, live = tonumber(ARGV[3]), 0
  for i = 4, #ARGV do
    if drop_all(redis.call('GETDEL', P .. ':r:' .. ARGV[i]), ARGV[i], now, {}) then
      live = live + 1
    end
  end
  return live

elseif op == 'status' then
  -- ARGV: numbers, lk... ; numbers: now, then per line: bucket, span, width
  local v = numbers(ARGV[3])
  local now, out = v[1], {}
  for i = 0, #ARGV - 4 do
    local at = 2 + i * 3
    state(fresh(ARGV[4 + i], v[at], v[at + 1], v[at + 2], false, now), false, out)
  end
  return ints(out)

elseif op == 'log' then
  -- ARGV: member, ts, day, day_start, log_ttl (< 0: forever)
  log(ARGV[3], ARGV[4], ARGV[5], tonumber(ARGV[6]), tonumber(ARGV[7]))
  return 1

end

return redis.error_reply('tb_plugins ledger: unknown operation ' .. tostring(op))
