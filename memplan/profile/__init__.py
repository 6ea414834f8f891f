"""`memplan profile`'s work: measure a plan's real training steps per phase and compare them with the
estimate. `command` gathers what the command shows, `launch` decides where the steps run (this process,
torchrun ranks, a subprocess per probe), `run` is the measured loop, `meters` the CUDA meter, `trace` the
tracer the estimator is tested against. Backends: trace (fake tensors), cpu, cuda. Importing this package
imports no torch; its modules do."""
