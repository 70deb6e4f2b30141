# ViG-T's recipe shrunk for a CPU: scikit-learn's digits as an image folder (tools/make_digits_folder.py),
# 32x32 images, a 4-block 64-wide ViG with ViG-T's flags, no mixup or RandAugment, 10 epochs.
_base_ = ['../vig/vig_t_8xb128_in1k.py']

data_root = 'data/digits'
img_size = 32
model = dict(
    model_args=dict(_delete_=True, num_classes=10, img_size=img_size, embed_dim=64, depth=4, num_heads=2),
    mixup=None,
    label_smoothing=0.0,
)
_train_transform = dict(input_size=img_size, is_training=True, scale=(0.7, 1.0), ratio=(0.9, 1.1), hflip=0.0,
                        auto_augment=None, color_jitter=None, re_prob=0.0, interpolation='bilinear')
_val_transform = dict(input_size=img_size, is_training=False, crop_pct=1.0, interpolation='bilinear')
train_dataloader = dict(
    batch_size=32, num_workers=0, persistent_workers=False, pin_memory=False,
    dataset=dict(data_root=data_root, transform=_train_transform))
val_dataloader = dict(
    batch_size=64, num_workers=0, persistent_workers=False, pin_memory=False,
    dataset=dict(data_root=data_root, transform=_val_transform))
test_dataloader = val_dataloader

max_epochs = 10
train_cfg = dict(max_epochs=max_epochs, val_interval=1)
auto_scale_lr = dict(enable=False)
optim_wrapper = dict(optimizer=dict(lr=2e-3))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=True, begin=0, end=1, convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', eta_min=1e-5, by_epoch=True, begin=1, end=max_epochs, T_max=max_epochs - 1,
         convert_to_iter_based=True),
]
default_hooks = dict(logger=dict(interval=10), checkpoint=dict(max_keep_ckpts=2))
custom_hooks = [
    dict(type='EpochSeedHook'),
    dict(type='ProgressHook', interval=10),
    dict(type='WeightsOnlyCheckpointHook'),
    dict(type='EMAHook', momentum=0.05, update_buffers=True),
]
