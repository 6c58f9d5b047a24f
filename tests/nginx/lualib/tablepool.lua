-- A minimal stand-in for OpenResty's lua-tablepool, which Debian does not package.
--
-- lua-resty-events' frame.lua borrows a two-slot table per send from the pool "to save
-- garbage"; handing out a fresh table and forgetting released ones keeps exactly the
-- behaviour that matters to the wire (one send of header + payload), only without reuse.
-- Written for the workerbus interop test; it is not OpenResty's code.

local table_new = require "table.new"

local _M = {}

function _M.fetch(_tag, narr, nrec)
    return table_new(narr or 0, nrec or 0)
end

function _M.release(_tag, _obj, _noclear)
end

return _M
