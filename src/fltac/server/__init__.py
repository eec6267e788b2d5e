"""Server side: pure aggregation maths and the strategies that use it. No engine, no model, no data."""
