# ImageNet-1k in ImageFolder layout (<data_root>/train/<class>/*.JPEG, <data_root>/val/<class>/*.JPEG),
# DeiT-style augmentation through timm's transforms; mixup/cutmix/label smoothing live in the model.
data_root = 'data/imagenet'
img_size = 224

train_dataloader = dict(
    batch_size=128,
    num_workers=8,
    persistent_workers=True,
    pin_memory=True,
    sampler=dict(type='RepeatedAugmentationSampler', shuffle=True, num_repeats=3),
    collate_fn=dict(type='collate_skipping_unreadable'),
    worker_init_fn=dict(type='seed_worker_from_torch'),
    dataset=dict(
        type='ImageFolderDataset', data_root=data_root, split='train',
        transform=dict(input_size=img_size, is_training=True, auto_augment='rand-m9-mstd0.5-inc1',
                       re_prob=0.25, re_mode='pixel', re_count=1, interpolation='bicubic',
                       color_jitter=0.4)),
)
val_dataloader = dict(
    batch_size=128,
    num_workers=8,
    persistent_workers=True,
    pin_memory=True,
    sampler=dict(type='DefaultSampler', shuffle=False),
    collate_fn=dict(type='collate_skipping_unreadable'),
    dataset=dict(
        type='ImageFolderDataset', data_root=data_root, split='val',
        transform=dict(input_size=img_size, is_training=False, interpolation='bicubic', crop_pct=0.875)),
)
test_dataloader = val_dataloader
val_evaluator = dict(type='TopKAccuracy', topk=(1, 5))
test_evaluator = val_evaluator
