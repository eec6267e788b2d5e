"""Engines run the round loop; strategies and client training know nothing about which engine runs them."""
