"""`bench/fleet_scale.py --cluster` as a benchmark of its own, so that bench/run_all.py runs and reports it
next to the single-broker run: the fleet's rollout on a three-node NATS cluster, clean and with a node
killed mid-rollout, against the same fleet on one Mosquitto. bench/fleet_scale.py's docstring says how.

Last line: ``CLUSTER_AGENTS=<N> CLUSTER_ALL_COMMITTED_S=<t> NODE_KILL_ALL_COMMITTED_S=<t> MOSQUITTO_ALL_COMMITTED_S=<t>``.
Goals: 200 agents committed within 60 s on the cluster, within 90 s with a node killed.

Run: .venv/bin/python bench/fleet_cluster.py [--agents 200] [--quick]
"""

from __future__ import annotations

import argparse

import fleet_scale  # bench/fleet_scale.py: a program's own folder is the first place Python looks


def main() -> None:
    """Run the cluster rollouts and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=200, help="agents in each fleet (200)")
    parser.add_argument("--per-process", type=int, default=25, help="agents per worker process (25)")
    parser.add_argument("--quick", action="store_true", help="20 agents")
    args = parser.parse_args()
    fleet_scale.cluster_main(20 if args.quick and args.agents == 200 else args.agents, args.per_process)


if __name__ == "__main__":
    main()
