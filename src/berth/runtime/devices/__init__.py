"""Devices in containers: one model, CDI container edits (DESIGN.md direction 11, issue 13).

- :mod:`.edits`: the model every device change becomes (device nodes, mounts, environment,
  hooks), the parser of ``--device`` requests, and the one function that judges edits and turns
  them into what the run plan takes;
- :mod:`.cdi`: CDI specs from the site's directories (hostile input: validated);
- :mod:`.ldcache`: the host's ld.so cache, read without running ldconfig;
- :mod:`.gpus`: the GPU generator (NVIDIA, AMD ROCm): allocation, selection, the per-user
  ledger, and the edits for the selected GPUs and the host driver's files;
- :mod:`.mpi`: host MPI injection (``--mpi host``): the site's MPICH-ABI libraries as edits,
  checked against the image's (:mod:`.elf` reads their sonames).
"""
