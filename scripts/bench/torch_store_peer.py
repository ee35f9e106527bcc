"""The torch side of scripts/bench/rdzv_scale: N simulated agents (Python threads), each with its own
torch.distributed.TCPStore client (Debian's python3-torch 1.13), join one round and heartbeat, doing the store
operations dtrain's rendezvous does (rendezvous/rendezvous.h) so that the two stores serve the same load:

  join:      add(count) -> index; set(node/<index>, record); the last joiner sets `closed`; everyone
             wait([closed]); the last joiner then writes a layout; everyone get(layout) and get(node/0)
  heartbeat: set(hb/<rank>, n)  then  get(hb/<rank+1>), get(hb/<rank+2>)   (dtrain's heartbeat ring; dtrain
             sends the three in one pipelined batch, torch's client has no batch of mixed operations)

(torch's own c10d rendezvous backend keeps the whole round in ONE pickled key that every agent reads and
compare-sets on every change: O(N^2) bytes; see pytorch#76913. Running that from 4,096 Python threads on one
machine measures the GIL more than the store, so this peer drives the store with dtrain's key layout instead.)

  server: /usr/bin/python3 torch_store_peer.py server PORTFILE        (prints nothing; runs until killed)
  agents: /usr/bin/python3 torch_store_peer.py agents PORT N BEATS INTERVAL_S
"""
import datetime
import sys
import threading
import time

import torch.distributed as dist


def percentile(sorted_values, p):
    if not sorted_values:
        return 0.0
    i = int(p * (len(sorted_values) - 1) + 0.5)
    return sorted_values[min(i, len(sorted_values) - 1)]


def server(port_file):
    store = dist.TCPStore("127.0.0.1", 0, None, True, datetime.timedelta(seconds=600), wait_for_workers=False)
    with open(port_file + ".tmp", "w") as f:
        f.write(str(store.port))
    import os
    os.rename(port_file + ".tmp", port_file)
    threading.Event().wait()


def agents(port, n, beats, interval):
    timeout = datetime.timedelta(seconds=600)
    stores = [None] * n
    errors = []
    connected = threading.Barrier(n + 1)
    go = threading.Event()
    joined_at = [0.0] * n
    join_ms = [0.0] * n
    beat_us, read_us, both_us = [], [], []
    lock = threading.Lock()
    all_joined = threading.Barrier(n, action=lambda: origin.append(time.monotonic()))
    origin = []

    def agent(i):
        try:
            stores[i] = dist.TCPStore("127.0.0.1", port, None, False, timeout)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(f"agent {i} connect: {e}")
        connected.wait()
        go.wait()
        s = stores[i]
        if s is None:
            return
        t0 = time.monotonic()
        index = s.add("r0/count", 1) - 1
        s.set(f"r0/node/{index}", f'{{"nproc": 8, "host": "127.0.0.1", "hostname": "sim{i}", "pid": {i}}}')
        if index == n - 1:
            s.set("r0/closed", str(n))
        s.wait(["r0/closed"])
        if index == n - 1:
            s.set("r0/layout", "".join(f"{k} 8\n" for k in range(n)))
        s.wait(["r0/layout"])
        s.get("r0/layout")
        s.get("r0/node/0")
        joined_at[i] = time.monotonic()
        join_ms[i] = (joined_at[i] - t0) * 1000
        all_joined.wait()
        nxt = origin[0] + interval * i / n
        mine_b, mine_r, mine_both = [], [], []
        for b in range(beats):
            delay = nxt - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            nxt += interval
            t0 = t = time.monotonic()
            s.set(f"r0/hb/{index}", str(b + 1))
            mine_b.append((time.monotonic() - t) * 1e6)
            t = time.monotonic()
            s.get(f"r0/hb/{(index + 1) % n}") if b > 0 else None
            s.get(f"r0/hb/{(index + 2) % n}") if b > 0 else None
            mine_r.append((time.monotonic() - t) * 1e6)
            mine_both.append((time.monotonic() - t0) * 1e6)
        with lock:
            beat_us.extend(mine_b)
            read_us.extend(mine_r[1:])
            both_us.extend(mine_both[1:])

    threading.stack_size(256 * 1024)
    threads = [threading.Thread(target=agent, args=(i,)) for i in range(n)]
    t_connect = time.monotonic()
    for t in threads:
        t.start()
    connected.wait()
    connect_s = time.monotonic() - t_connect
    t_join = time.monotonic()
    go.set()
    for t in threads:
        t.join()
    if errors:
        print(f"torch TCPStore: {len(errors)} agent(s) failed; first: {errors[0]}")
        return 1
    form_s = max(joined_at) - t_join
    join_ms.sort()
    beat_us.sort()
    read_us.sort()
    both_us.sort()
    print(f"torch TCPStore (torch {__import__('torch').__version__}): {n} agents (Python threads), one round")
    print(f"connect   {connect_s:8.3f} s   (every agent's store connection)")
    print(f"form      {form_s:8.3f} s   (all agents join -> the last join returns)")
    print(f"join      p50 {percentile(join_ms, 0.5):.1f} ms  p99 {percentile(join_ms, 0.99):.1f} ms  max {join_ms[-1]:.1f} ms (per agent)")
    print(f"{beats} heartbeats per agent at {interval:g}s, spread over the interval:")
    print(f"{'op':<10} {'p50 us':>9} {'p90 us':>9} {'p99 us':>9} {'p99.9 us':>9} {'max us':>9}")
    # "beat": the set and the two reads together, what dtrain's heartbeat row measures (one batch there)
    for name, v in (("set", beat_us), ("members", read_us), ("beat", both_us)):
        print(f"{name:<10} {percentile(v, 0.5):9.1f} {percentile(v, 0.9):9.1f} {percentile(v, 0.99):9.1f} "
              f"{percentile(v, 0.999):9.1f} {v[-1] if v else 0:9.1f}")
    return 0


if __name__ == "__main__":
    if sys.argv[1] == "server":
        server(sys.argv[2])
    else:
        sys.exit(agents(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])))
