"""berth server: engine, HTTP front end and CLI."""
import os

# OpenMP's default busy-wait collapses throughput when the cores are shared (measured: a 65 ms decode
# step became 0.7-2 s under contention); passive waiting costs nothing measurable when idle.
# Must be set before torch is first imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
