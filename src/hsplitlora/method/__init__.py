"""The method: importance identification (IWI), the memory model, the split/rank planner (ARMSC)."""
