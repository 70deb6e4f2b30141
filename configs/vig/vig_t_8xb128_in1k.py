# ViG-T on ImageNet-1k, the official recipe (hustvl/ViG): 8 GPUs x 128 = 1024 images per step.
_base_ = ['../_base_/default_runtime.py', '../_base_/datasets/imagenet.py',
          '../_base_/schedules/adamw_cosine_300e.py']

model = dict(
    type='TimmClassifier',
    model_name='vig_t',
    model_args=dict(num_classes=1000, drop_path_rate=0.0),
    mixup=dict(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5, mode='batch'),
    label_smoothing=0.1,
)
# no repeated augmentation in the ViG recipe
train_dataloader = dict(sampler=dict(_delete_=True, type='DefaultSampler', shuffle=True))
optim_wrapper = dict(optimizer=dict(weight_decay=0.05), clip_grad=dict(max_norm=5.0))
# 20 warm-up epochs from 5e-7 to 1e-3 (5e-4 per 512 images at batch 1024), cosine to 5e-6
param_scheduler = [
    dict(type='LinearLR', start_factor=5e-4, by_epoch=True, begin=0, end=20, convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', eta_min=5e-6, by_epoch=True, begin=20, end=300, T_max=280,
         convert_to_iter_based=True),
]
custom_hooks = [
    dict(type='EpochSeedHook'),
    dict(type='ProgressHook', interval=50),
    dict(type='WeightsOnlyCheckpointHook'),
    dict(type='EMAHook', momentum=1e-4, update_buffers=True),   # EMA decay 0.9999
]
