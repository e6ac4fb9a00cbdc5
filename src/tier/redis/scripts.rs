//! The Lua scripts that bump and raise epochs in Redis: store, raise the high water and publish
//! in one step.

/// Shared by both scripts: epoch values as Lua numbers. Lua's numbers are doubles, exact up to
/// 2^53 - 1 (about 285 years of microseconds); an absent key is 0, and a value that is not a
/// plain integer within that range (only a Redis writer could have stored one) is saturated:
/// `nil`, stored back as the largest bigint, which every instance reads as `EPOCH_MAX`.
pub(super) const LUA_EPOCHS: &str = r"
local LIMIT = 9007199254740991
local SAT = '9223372036854775807'
local function num(s)
  if not s then return 0 end
  if not string.match(s, '^%d+$') then return nil end
  local n = tonumber(s)
  if n == nil or n > LIMIT then return nil end
  return n
end
local function str(n)
  if n == nil or n > LIMIT then return SAT end
  -- Lua 5.1 prints numbers past 14 digits in exponent form: format the integer explicitly.
  return string.format('%.0f', n)
end
local function store(key, s, px)
  if px == '0' then redis.call('SET', key, s) else redis.call('SET', key, s, 'PX', px) end
end
";

/// Bumps an epoch where it is stored: `max(stored + 1, floor, high water + 1)`, so the stored
/// value always rises, whatever the caller's clock, and never falls under any value assigned
/// before; stores it (with an expiry, except the global one), raises the high water, publishes
/// it, and returns it. KEYS: high water, epoch key. ARGV: floor, px (0 = none), channel, message
/// prefix.
pub(super) const BUMP: &str = r"
local floor = num(ARGV[1])
local hw = num(redis.call('GET', KEYS[1]))
local cur = num(redis.call('GET', KEYS[2]))
local v = nil
if floor ~= nil and hw ~= nil and cur ~= nil then
  v = math.max(cur + 1, floor, hw + 1)
end
local s = str(v)
redis.call('SET', KEYS[1], s)
store(KEYS[2], s, ARGV[2])
redis.call('PUBLISH', ARGV[3], ARGV[4] .. s)
return s
";

/// Raises an epoch to a value assigned elsewhere (the durable epochs in Postgres): never lowers
/// it; a value that is no integer is replaced. Raises the high water too, and publishes the
/// value. KEYS: high water, epoch key. ARGV: value, px (0 = none), channel, message prefix.
pub(super) const RAISE: &str = r"
local v = num(ARGV[1])
local raw = redis.call('GET', KEYS[2])
local cur = num(raw)
local garbage = raw and not string.match(raw, '^%d+$')
if v ~= nil and (garbage or (cur ~= nil and v > cur)) then
  store(KEYS[2], str(v), ARGV[2])
end
local hw = num(redis.call('GET', KEYS[1]))
if v ~= nil and hw ~= nil and v > hw then
  redis.call('SET', KEYS[1], str(v))
end
redis.call('PUBLISH', ARGV[3], ARGV[4] .. ARGV[1])
return 1
";
