"""blocks package of Oyster Dispatch (see DESIGN.md section 2)."""
