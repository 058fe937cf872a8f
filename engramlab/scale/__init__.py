"""Scale-out: where units of work run (``executor``: this process or Ray tasks).

==========  =====================================================================================
module      concern
==========  =====================================================================================
executor    ``ExecutorConfig`` (--executor local|ray, --ray-address, --retries, --task-cpus,
            --task-gpus, --task-memory), ``Unit`` / ``Outcome``, ``Executor.run``
==========  =====================================================================================
"""
