"""Hold all free GPU memory except BUDGET GiB (+0.6 GiB of slack), so that a second process sees the free
memory of a smaller card (a second process holding the rest). Prints READY once holding; exits on stdin EOF/kill."""
import sys
import time

import torch

budget_gib = float(sys.argv[1])
free, _ = torch.cuda.mem_get_info()
keep = int((budget_gib + 0.6) * 2**30)
grab = max(0, free - keep)
block = torch.empty(grab, dtype=torch.uint8, device="cuda") if grab else None
print(f"READY holding {grab / 2**30:.2f} GiB, leaving {(free - grab) / 2**30:.2f} GiB", flush=True)
while True:
    time.sleep(3600)
