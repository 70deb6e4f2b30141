# Fine-tune ViG-S from a checkpoint on your own image folder at a new resolution and class count:
#   python tools/train.py configs/finetune/vig_s_ft_folder.py \
#       --cfg-options model.init_checkpoint=vig_s.pth model.model_args.num_classes=37 data_root=...
# (data_root/<train,val>/<class>/<image>; the classifier is re-initialised when the class count
# differs, and the position embedding is resampled to the new resolution.)
_base_ = ['../vig/vig_s_8xb128_in1k.py']

data_root = 'data/my_folder'
img_size = 384
model = dict(
    model_args=dict(num_classes=100, img_size=img_size, drop_path_rate=0.1),
    init_checkpoint='checkpoints/vig_s.pth',
)
train_dataloader = dict(batch_size=32, dataset=dict(data_root=data_root, transform=dict(input_size=img_size)))
val_dataloader = dict(batch_size=32, dataset=dict(data_root=data_root,
                                                  transform=dict(input_size=img_size, crop_pct=1.0)))
test_dataloader = val_dataloader
max_epochs = 30
train_cfg = dict(max_epochs=max_epochs)
optim_wrapper = dict(optimizer=dict(lr=5e-5, weight_decay=0.05))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-2, by_epoch=True, begin=0, end=2, convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', eta_min=1e-6, by_epoch=True, begin=2, end=max_epochs, T_max=max_epochs - 2,
         convert_to_iter_based=True),
]
