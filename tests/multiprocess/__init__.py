"""Tests on real ranks spawned from this process into one gloo group (``support.run_spawn``); nothing launched."""
