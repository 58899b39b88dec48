"""Process-level helpers that every part of dinolab may use and that import nothing of dinolab:
``runtime`` (device, precision, autocast, compile) and ``cpu_tuning`` (cache-sized row blocks, glibc's freed-memory
policy)."""
