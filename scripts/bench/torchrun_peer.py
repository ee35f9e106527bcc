"""torchrun (torch.distributed.run) from Debian's python3-torch 1.13, usable on Python 3.11.

Python 3.11 changed how IntFlag members compare in a loop, so torch 1.13's Std.from_str returns None for
"0" and torchrun crashes before launching anything. This wrapper fixes that one function in memory (the system
file stays untouched) and then runs torchrun's own main() with the given arguments.
Usage: /usr/bin/python3 scripts/bench/torchrun_peer.py [torchrun args...]
"""
import re
import sys

from torch.distributed.elastic.multiprocessing import api
from torch.distributed.run import main


def _from_str(vm):
    if re.match(r"^[0-3]$", vm):
        return api.Std(int(vm))
    if re.match(r"^(\d:[0-3],)*(\d:[0-3])$", vm):
        return {int(i): api.Std(int(v)) for i, v in (m.split(":") for m in vm.split(","))}
    raise ValueError(f"{vm} does not match <0-3> or <local_rank:0-3,...>")


api.Std.from_str = staticmethod(_from_str)

if __name__ == "__main__":
    sys.exit(main())
