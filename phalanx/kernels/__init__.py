"""Hot numeric code with a pure-torch reference for each (the low-communication issue)."""
