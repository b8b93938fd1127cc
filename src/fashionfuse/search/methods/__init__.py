"""Search methods, one module each (`registry.BUILTIN_METHODS` names them)."""
