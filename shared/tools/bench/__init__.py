"""``workerbus bench``: workerbus measured against its peers, in one run, on this machine.

- :mod:`.peers`: one module per scenario (workerbus per transport and event loop, the
  minimal raw-UDS broker, pyzmq, Redis, multiprocessing queues, a shared-memory poller);
- :mod:`.fanout` + :mod:`.worker` + :mod:`.tally`: one measured fan-out run and the
  processes in it; :mod:`.procfs`: CPU and memory from /proc;
- :mod:`.runner`: the plan, repetitions, medians, noise control;
- :mod:`.seed` + :mod:`.seedapp`: the seed experiment (uvicorn + wrk under an event storm);
- :mod:`.report`: tables, Markdown and target verdicts; :mod:`.cli`: the command line.

The peers' packages are optional (the ``bench`` extra); nothing here is imported by the
library itself.
"""
