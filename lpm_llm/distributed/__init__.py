"""Several processes, one run: ``torch.distributed`` (gloo on CPU, NCCL on GPU), started by ``torchrun``.

- :mod:`~lpm_llm.distributed.group`: joining the group (backend, timeout, device by local rank) and
  the collectives the runner uses (deal work out, gather results on rank 0, broadcast).
- :mod:`~lpm_llm.distributed.launch`: ``lpm-llm run ... --nproc N`` as a ``torchrun`` command.
"""

from lpm_llm.distributed.group import DistributedSettings, Group, launched_by_torchrun, process_group
from lpm_llm.distributed.launch import launch, launch_command

__all__ = ["DistributedSettings", "Group", "launch", "launch_command", "launched_by_torchrun", "process_group"]
