# RAVLT-T on ImageNet-1k, the official recipe (qhfan/RALA, DeiT codebase): 8 GPUs x 128 images,
# lr 5e-4 x batch / 512, 5 warm-up epochs, cosine to 1e-5, repeated augmentation, EMA 0.99996, AMP.
_base_ = ['../_base_/default_runtime.py', '../_base_/datasets/imagenet.py',
          '../_base_/schedules/adamw_cosine_300e.py']

model = dict(
    type='TimmClassifier',
    model_name='ravlt_t',
    model_args=dict(num_classes=1000, drop_path_rate=0.1),
    mixup=dict(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5, mode='batch'),
    label_smoothing=0.1,
)
optim_wrapper = dict(type='AmpOptimWrapper', dtype='float16', loss_scale='dynamic')
custom_hooks = [
    dict(type='EpochSeedHook'),
    dict(type='ProgressHook', interval=50),
    dict(type='WeightsOnlyCheckpointHook'),
    # EMA 0.99996 per 512 images, raised to the power batch / 512 as the official code: 1 - 0.99996 ** 2
    dict(type='EMAHook', momentum=8e-5, update_buffers=True),
]
