"""Process-level helpers that every part of dinolab may use and that import nothing of dinolab's other packages:
``io`` (atomic writes, path checks), ``runtime`` (device, precision, autocast, compile) and ``cpu_tuning``
(cache-sized row blocks, glibc's freed-memory policy)."""
