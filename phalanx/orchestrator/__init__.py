"""The controller side: plan, launch, watch, recover. Never runs model code."""
