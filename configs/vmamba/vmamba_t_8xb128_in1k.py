# VMamba-T (v2, vssm1_tiny_0230s) on ImageNet-1k, the official recipe (MzeroMiko/VMamba, Swin codebase):
# 8 GPUs x 128, lr 5e-4 x batch / 512, weight decay 0.05, 20 warm-up epochs from 5e-7 x batch / 512,
# cosine to 5e-6 x batch / 512 (1e-5 at 1024), grad clip 5, EMA 0.9999, AMP, drop path 0.2.
_base_ = ['../_base_/default_runtime.py', '../_base_/datasets/imagenet.py',
          '../_base_/schedules/adamw_cosine_300e.py']

model = dict(
    type='TimmClassifier',
    model_name='vmamba_t',
    model_args=dict(num_classes=1000, drop_path_rate=0.2),
    mixup=dict(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5, mode='batch'),
    label_smoothing=0.1,
)
train_dataloader = dict(sampler=dict(_delete_=True, type='DefaultSampler', shuffle=True))
optim_wrapper = dict(type='AmpOptimWrapper', dtype='float16', loss_scale='dynamic',
                     optimizer=dict(weight_decay=0.05), clip_grad=dict(max_norm=5.0))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-3, by_epoch=True, begin=0, end=20, convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', eta_min=1e-5, by_epoch=True, begin=20, end=300, T_max=280,
         convert_to_iter_based=True),
]
custom_hooks = [
    dict(type='EpochSeedHook'),
    dict(type='ProgressHook', interval=50),
    dict(type='WeightsOnlyCheckpointHook'),
    dict(type='EMAHook', momentum=1e-4, update_buffers=True),   # EMA decay 0.9999
]
