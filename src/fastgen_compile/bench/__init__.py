"""Serving benchmarks: the DeepSpeed-FastGen paper's workloads, load generators, SLA metrics and reports."""
