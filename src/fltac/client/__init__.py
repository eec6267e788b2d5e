"""Client side: local training of adapters. No engine, no strategy."""
