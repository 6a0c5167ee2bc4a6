"""Parity stage (torch-free): parity inputs, the parity set, runners, the comparator, the gate, exact arithmetic."""
