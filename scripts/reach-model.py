#!/usr/bin/env python3
"""What an ideal dialer could reach in `bench-dialing reach`: a discrete-event model, not a benchmark.

It plays the realistic sim-city profile (node/src/simcity/profile.rs, approximated: per-call outcome
drawn afresh on every attempt) against the benchmark's retry policy (at most 6 attempts; 5 s after
busy or a failure, 8 s after no answer, voicemail or an unconfirmed answer) with no latency at all:
a channel starts its next call the instant one ends and a retry is dialled the instant it is due.
The city's congestion (2 % of calls: 503 with Retry-After: 1) pauses the node's new calls for that
second, as the trunk gate does (`--no-backoff` to see what that costs).
Citizens are split at random over the nodes (as partitions split them), each node with its own
share of the channels, as in the cluster. Efficiency = channel bound / completion, as the benchmark
computes it. The gap between this and 1.0 is what the retry chains and the split cost any dialer; the
gap between this and the benchmark is what our dialer costs.

    python3 scripts/reach-model.py --subscribers 12500 --channels 450 --seeds 6
"""
import argparse
import collections
import heapq
import random


def call(rng):
    """One call: (seconds on the channel, final?, retry delay); final None = the trunk's 503."""
    r = rng.random()
    if r < 0.60:  # answered
        a = rng.uniform(0.3, 3.0)
        p = rng.random()
        if p < 0.75:
            return a + rng.uniform(2, 5) + 0.5, True, 0  # presses 1 in time
        if p < 0.85:
            return a + 20, False, 8  # would press too late: message, replay, no 1
        if p < 0.90:
            return a + rng.uniform(1, 3), False, 8  # hangs up early
        return a + 20, False, 8  # listens, never presses
    r -= 0.60
    if r < 0.12:
        return 0.05, False, 5  # busy
    r -= 0.12
    if r < 0.12:
        return 8.0, False, 8  # no answer within the ring timeout
    r -= 0.12
    if r < 0.06:
        return 1.0, False, 5  # unreachable
    r -= 0.06
    if r < 0.08:
        return 15.0, False, 8  # voicemail: greeting, beep, message
    return 0.05, None, 0  # congestion (503): not the citizen's attempt


def node(n, channels, order, seed, backoff, cps, window):
    rng = random.Random(seed)
    sent = collections.deque()  # the latest `cps` call starts (window) or the last one (spaced)
    attempts = [0] * n

    def key(i, due):
        if order == "due":
            return (due, i)
        return (0 if attempts[i] == 0 else 1, attempts[i], due, i)  # fewest attempts first

    ready = [(key(i, 0.0), i) for i in range(n) if rng.random() >= 0.02]  # 2 % invalid numbers
    heapq.heapify(ready)
    events, free, work, last, closed_until = [], channels, 0.0, 0.0, 0.0

    def next_slot(t):
        """When the next call may start under the calls-per-second limit."""
        if not cps:
            return t
        if window:
            return t if len(sent) < cps else max(t, sent[0] + 1.0)
        return max(t, sent[-1] + 1.0 / cps) if sent else t

    def start(t):
        nonlocal free, work
        while free and ready and t >= closed_until:
            slot = next_slot(t)
            if slot > t:
                heapq.heappush(events, (slot, 2, -1, None, None))
                break
            sent.append(t)
            if len(sent) > (cps if window else 1):
                sent.popleft()
            _, i = heapq.heappop(ready)
            d, final, delay = call(rng)
            work += d
            free -= 1
            heapq.heappush(events, (t + d, 0, i, final, delay))

    start(0.0)
    while events:
        t, kind, i, final, delay = heapq.heappop(events)
        if kind == 0:  # a call ended
            free += 1
            if final is None:
                heapq.heappush(ready, (key(i, t), i))
                if backoff and t + 1.0 > closed_until:
                    closed_until = t + 1.0
                    heapq.heappush(events, (closed_until, 2, -1, None, None))
            else:
                attempts[i] += 1
                if not final and attempts[i] < 6:
                    heapq.heappush(events, (t + delay, 1, i, None, None))
        elif kind == 1:  # a retry is due
            heapq.heappush(ready, (key(i, t), i))
        start(t)
        last = t
    return work, last


def cluster(subscribers, channels, nodes, order, seed, backoff, cps=0, window=False):
    split = random.Random(seed * 7919)
    sizes = [0] * nodes
    for _ in range(subscribers):
        sizes[split.randrange(nodes)] += 1
    runs = [
        node(s, channels // nodes, order, seed * 10 + k, backoff, cps, window)
        for k, s in enumerate(sizes)
    ]
    bound = sum(w for w, _ in runs) / channels
    return bound / max(last for _, last in runs)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subscribers", type=int, default=12500)
    ap.add_argument("--channels", type=int, default=450)
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--seeds", type=int, default=6)
    ap.add_argument("--no-backoff", action="store_true", help="ignore the 503s' Retry-After")
    ap.add_argument("--cps", type=int, default=0,
                    help="each node's calls-per-second limit (0: none; the benchmark's nodes have 100)")
    ap.add_argument("--window", action="store_true",
                    help="count the limit per one-second window (bursts allowed) instead of spacing calls 1/cps apart")
    args = ap.parse_args()
    for order in ("due", "fewest-attempts"):
        effs = [
            cluster(args.subscribers, args.channels, args.nodes, order, s, not args.no_backoff,
                    args.cps, args.window)
            for s in range(1, args.seeds + 1)
        ]
        print(f"{order:>16} order: efficiency " + " ".join(f"{e:.3f}" for e in effs)
              + f"  (mean {sum(effs) / len(effs):.3f})")


if __name__ == "__main__":
    main()
