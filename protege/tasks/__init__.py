"""Built-in tasks (data, exact-match checkers and shipped tiny models)."""
