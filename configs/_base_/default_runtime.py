# Runtime shared by every recipe: hooks, logging, checkpoints (written atomically), seeding.
custom_imports = dict(imports=['visionlin.training'], allow_failed_imports=False)
default_scope = None

default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=50),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(type='CheckpointHook', interval=1, max_keep_ckpts=3,
                    backend_args=dict(backend='local_atomic')),
    sampler_seed=dict(type='DistSamplerSeedHook'),
)
custom_hooks = [
    dict(type='EpochSeedHook'),
    dict(type='ProgressHook', interval=50),
    dict(type='WeightsOnlyCheckpointHook'),
]

env_cfg = dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
               dist_cfg=dict(backend='nccl'))
randomness = dict(seed=0, deterministic=False)
log_processor = dict(by_epoch=True, window_size=50)
log_level = 'INFO'
visualizer = dict(type='Visualizer', vis_backends=[dict(type='LocalVisBackend')])
load_from = None
resume = False
