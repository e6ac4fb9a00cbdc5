//! The cluster tier's scripts: each touches one key (one slot), so none needs a cross-slot
//! transaction. The number helpers are the single-node tier's (`LUA_EPOCHS`).

/// `max(stored + 1, floor)` on one epoch key (no global sequence: the floor, the caller's hybrid
/// clock, keeps values above what the caller has seen); stored with its expiry, published, and
/// returned. KEYS: epoch key. ARGV: floor, px (0 = none), channel, message prefix.
pub(super) const BUMP: &str = r"
local floor = num(ARGV[1])
local cur = num(redis.call('GET', KEYS[1]))
local v = nil
if floor ~= nil and cur ~= nil then
  v = math.max(cur + 1, floor)
end
local s = str(v)
store(KEYS[1], s, ARGV[2])
redis.call('PUBLISH', ARGV[3], ARGV[4] .. s)
return s
";

/// Raises one epoch key to a value assigned elsewhere, never lowering it (a value that is no
/// integer is replaced), and publishes the value. KEYS: epoch key. ARGV: value, px, channel,
/// message prefix.
pub(super) const RAISE: &str = r"
local v = num(ARGV[1])
local raw = redis.call('GET', KEYS[1])
local cur = num(raw)
local garbage = raw and not string.match(raw, '^%d+$')
if v ~= nil and (garbage or (cur ~= nil and v > cur)) then
  store(KEYS[1], str(v), ARGV[2])
end
redis.call('PUBLISH', ARGV[3], ARGV[4] .. ARGV[1])
return 1
";

/// Raises the high water to at least a value (a garbage high water is replaced). KEYS: high
/// water. ARGV: value.
pub(super) const RAISE_HIGH_WATER: &str = r"
local v = num(ARGV[1])
local raw = redis.call('GET', KEYS[1])
local hw = num(raw)
if v ~= nil and (hw == nil or v > hw) then
  redis.call('SET', KEYS[1], str(v))
end
return 1
";
