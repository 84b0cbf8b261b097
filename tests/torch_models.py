"""Models as torch code would write them, to compare graphc's with (tests that import torch)."""


def torch_resnet(torch, depth, widths=(16, 32, 64), classes=10, channels=3):
    """The CIFAR ResNet as torch code would write it (torchvision's names, option-B shortcuts)."""
    nn = torch.nn

    class BasicBlock(nn.Module):
        def __init__(self, c_in, c_out, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(c_out)
            self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(c_out)
            self.downsample = None
            if stride != 1 or c_in != c_out:
                self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

        def forward(self, x):
            h = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
            return torch.relu(h + (x if self.downsample is None else self.downsample(x)))

    class ResNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(channels, widths[0], 3, 1, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(widths[0])
            c_in = widths[0]
            for stage, width in enumerate(widths):
                blocks = [BasicBlock(c_in if i == 0 else width, width, 2 if stage and i == 0 else 1)
                          for i in range((depth - 2) // 6)]
                setattr(self, f"layer{stage + 1}", nn.Sequential(*blocks))
                c_in = width
            self.fc = nn.Linear(widths[-1], classes)
            self.stages = len(widths)

        def forward(self, x):
            h = torch.relu(self.bn1(self.conv1(x)))
            for stage in range(self.stages):
                h = getattr(self, f"layer{stage + 1}")(h)
            return self.fc(h.mean(dim=(2, 3)))

    return ResNet()
