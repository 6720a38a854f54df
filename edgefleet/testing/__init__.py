"""The kit for integration tests and benchmarks: real brokers, real agents, and ways to hurt them.

It ships with the package so that the test suite (tests/) and the benchmarks (bench/) drive the
installed code the same way, from any directory:

- `broker`: throwaway Mosquitto brokers on free ports (plain and TLS, with a throwaway CA), `client()`
  and `Inbox` for the other end.
- `nats`, `amqtt`: the other engines: NATS (one node, or a cluster on loopback) and amqtt, each a
  `servers.ServerProcess` with the same `.url`, `start()`, `stop()`, `kill()` as the Mosquitto launcher.
- `agentproc`: a real `edge-agent run` process with its own config, state directory and API socket.
- `waiting`: `wait_for`, polling a condition until it holds or failing with what it waited for.
- `reliability`: the model zoo and bundles built from it, agents behind a command prefix or prelude,
  an `Operator` and a `Fleet` (broker + operator + agents), hostile installs through a real agent.
- `killing`: SIGKILL at random crash points and moments over many update cycles, checked after each restart.
- `hostile`: hostile `.tflite` files made from a good one (bit flips, truncations, lying flatbuffers,
  huge arenas).
- `faults`: broker and disk fault scenarios against a running `Fleet`.
- `soak`: steady API load over model updates and a rollback, with latency and memory figures.
- `zoo`: the tiny models, built by running it as a program (the only place TensorFlow is imported).

Nothing here imports TensorFlow when imported, and the agent never imports this package; the modules
import their own dependencies, so importing one does not import the rest.
"""
