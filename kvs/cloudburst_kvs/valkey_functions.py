"""The Valkey Functions library that merges lattices on the primary that owns the key.

Loaded with ``FUNCTION LOAD REPLACE`` on every primary when a
:class:`~cloudburst_kvs.valkey_store.ValkeyStore` starts (replicas receive it
by replication, so a promoted replica has it too). The layout it reads and
writes is described in :mod:`cloudburst_kvs.valkey_codec`.

Large values stay out of the scripting engine: a value over the inline limit
is first written to a staging key in the same slot with a plain ``SET``
(pipelined on the same connection), and the function compares only the
headers, read with ``GETRANGE``, then moves the winner into place with
``RENAME``, which moves a pointer, not bytes. Only a tie on time, writer and
serializer makes the function read the values' bytes, to break it the way
:func:`cloudburst_kvs.lattices.lww_order_key` does.
"""

from __future__ import annotations

#: The library's name; bump the suffix when a function's contract changes.
LIBRARY = "cloudburst_kvs_1"
LWW_PUT = "cbkvs1_lww_put"
SET_PUT = "cbkvs1_set_put"
DELETE = "cbkvs1_delete"

#: The reply error a put gets when the key holds a lattice of the other kind.
KIND_ERROR = "CBKIND"

SOURCE = r"""#!lua name=cloudburst_kvs_1

local HEADER = 17

-- Byte-wise comparison, independent of the server's locale (Lua's '<' uses strcoll).
local function bytecmp(a, b)
  if a == b then return 0 end
  local n = math.min(#a, #b)
  local i = 1
  local step = 4096
  while i + step - 1 <= n and string.sub(a, i, i + step - 1) == string.sub(b, i, i + step - 1) do
    i = i + step
  end
  while i <= n do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then
      if x < y then return -1 end
      return 1
    end
    i = i + 1
  end
  if #a < #b then return -1 end
  if #a > #b then return 1 end
  return 0
end

local function writer_len(header)
  local b1, b2, b3, b4 = string.byte(header, 14, 17)
  return ((b1 * 256 + b2) * 256 + b3) * 256 + b4
end

-- <0: the stored write orders before the incoming one; 0: equal; >0: after.
local function compare(data, header, incoming_data)
  local fixed = redis.call('GETRANGE', data, 0, HEADER - 1)
  local c = bytecmp(string.sub(fixed, 2, 9), string.sub(header, 2, 9))
  if c ~= 0 then return c end
  local wl = writer_len(fixed)
  local writer = ''
  if wl > 0 then writer = redis.call('GETRANGE', data, HEADER, HEADER + wl - 1) end
  c = bytecmp(writer, string.sub(header, HEADER + 1))
  if c ~= 0 then return c end
  c = bytecmp(string.sub(fixed, 10, 13), string.sub(header, 10, 13))
  if c ~= 0 then return c end
  return bytecmp(redis.call('GETRANGE', data, HEADER + wl, -1), incoming_data())
end

-- KEYS: data key [, staging key]; ARGV: channel, key id, header, inline value, inline limit.
-- Returns {1} when the incoming write won, {2} when it equals the stored one,
-- {0, stored} when the stored one won (stored only when at most the inline limit).
local function lww_put(keys, args)
  local data, stage = keys[1], keys[2]
  local chan, kid, header, blob, limit = args[1], args[2], args[3], args[4], tonumber(args[5])
  local kind = redis.call('TYPE', data)['ok']
  if kind == 'set' then
    if stage then redis.call('DEL', stage) end
    return redis.error_reply('CBKIND set')
  end
  local outcome = -1
  if kind ~= 'none' then
    outcome = compare(data, header, function()
      if stage then return redis.call('GETRANGE', stage, #header, -1) end
      return string.sub(blob, #header + 1)
    end)
  end
  if outcome < 0 then
    if stage then
      redis.call('RENAME', stage, data)
      redis.call('PERSIST', data)
      redis.call('SPUBLISH', chan, 'R' .. kid)
    else
      redis.call('SET', data, blob)
      redis.call('SPUBLISH', chan, 'V' .. kid .. blob)
    end
    return {1}
  end
  if stage then redis.call('DEL', stage) end
  if outcome == 0 then return {2} end
  if redis.call('STRLEN', data) <= limit then return {0, redis.call('GET', data)} end
  return {0}
end

-- KEYS: data key, staging set; ARGV: channel, key id. Returns 1 when the set grew.
local function set_put(keys, args)
  local data, stage = keys[1], keys[2]
  local kind = redis.call('TYPE', data)['ok']
  if kind == 'string' then
    redis.call('DEL', stage)
    return redis.error_reply('CBKIND lww')
  end
  local before = redis.call('SCARD', data)
  local after = redis.call('SUNIONSTORE', data, data, stage)
  redis.call('DEL', stage)
  if after ~= before then
    redis.call('SPUBLISH', args[1], 'R' .. args[2])
    return 1
  end
  return 0
end

-- KEYS: data key; ARGV: channel, key id. Returns 1 when the key existed.
local function delete(keys, args)
  local existed = redis.call('DEL', keys[1])
  if existed == 1 then redis.call('SPUBLISH', args[1], 'D' .. args[2]) end
  return existed
end

redis.register_function('cbkvs1_lww_put', lww_put)
redis.register_function('cbkvs1_set_put', set_put)
redis.register_function('cbkvs1_delete', delete)
"""

__all__ = ["DELETE", "KIND_ERROR", "LIBRARY", "LWW_PUT", "SET_PUT", "SOURCE"]
