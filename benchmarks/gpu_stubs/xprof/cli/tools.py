"""Stand-in for xprof on the benchmark GPU machine: tokamax imports this name at import time only."""

get_kernel_stats_tool = None
