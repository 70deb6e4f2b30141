# Vim-T on ImageNet-1k, the official recipe (hustvl/Vim, DeiT codebase, vim/scripts/pt-vim-t.sh):
# 8 GPUs x 128, lr 5e-4 (not scaled by the batch in the official code: 5e-4 at 1024 images),
# weight decay 0.1, drop path 0, 5 warm-up epochs, cosine to 1e-5, repeated augmentation,
# EMA 0.99996, fp32 (--no_amp).
_base_ = ['../_base_/default_runtime.py', '../_base_/datasets/imagenet.py',
          '../_base_/schedules/adamw_cosine_300e.py']

model = dict(
    type='TimmClassifier',
    model_name='vim_t',
    model_args=dict(num_classes=1000, drop_path_rate=0.0),
    mixup=dict(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5, mode='batch'),
    label_smoothing=0.1,
)
optim_wrapper = dict(optimizer=dict(lr=5e-4, weight_decay=0.1))
auto_scale_lr = dict(base_batch_size=1024, enable=True)
custom_hooks = [
    dict(type='EpochSeedHook'),
    dict(type='ProgressHook', interval=50),
    dict(type='WeightsOnlyCheckpointHook'),
    dict(type='EMAHook', momentum=4e-5, update_buffers=True),   # EMA decay 0.99996 per step
]
