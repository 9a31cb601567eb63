"""Privacy at the cut (method.md section 10): what the main server can read from what it receives."""
