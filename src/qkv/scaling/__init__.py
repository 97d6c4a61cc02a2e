"""qkv.scaling: scaling-law fits (fit.py), runs tables (runs.py), parameter counts from
configs (count.py), figures (plots.py), fit reports (report.py), IsoFLOP sweeps (sweep.py),
the compute-optimal calculator (optimal.py) and the MoE study (moe_study.py)."""
