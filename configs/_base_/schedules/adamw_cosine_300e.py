# AdamW + linear warm-up + cosine, 300 epochs; lr is given per 512 images and scaled to the real
# global batch (auto_scale_lr), as the official recipes do (5e-4 x batch / 512).
max_epochs = 300
warmup_epochs = 5
optim_wrapper = dict(
    type='OptimWrapper',
    constructor='TimmParamGroupsConstructor',
    optimizer=dict(type='AdamW', lr=5e-4, weight_decay=0.05, betas=(0.9, 0.999), eps=1e-8),
)
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-3, by_epoch=True, begin=0, end=warmup_epochs,
         convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', eta_min=1e-5, by_epoch=True, begin=warmup_epochs, end=max_epochs,
         T_max=max_epochs - warmup_epochs, convert_to_iter_based=True),
]
train_cfg = dict(by_epoch=True, max_epochs=max_epochs, val_interval=1)
val_cfg = dict()
test_cfg = dict()
auto_scale_lr = dict(base_batch_size=512, enable=True)
