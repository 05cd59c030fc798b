"""Data parallelism on a real engine, one module per concern:

    comm.py           communicators (one process, MPI, NCCL), the launcher's environment, the job's
                      communicator, the count-weighted loss (count_targets, loss_weight)
    watchdog.py       ends a rank whose collective waits too long or whose launcher has gone
    zero.py           ZeRO stage 1 (ZeroAdamW: AdamW with sharded moments; ZeroMuon: whole matrices
                      per rank), reduce_gradients
    data_parallel.py  DataParallel: the trainer's plug (count-weighted gradient sum, shared eval, Ctrl-C)
    launcher.py       `mpiexec -n N npgpt ...`: the command line with one voice, the data-parallel bench
                      (a floor higher: it times training steps through npgpt.bench)

Each name is imported from the module that owns it (`from npgpt.distributed.comm import get_communicator`).
"""
