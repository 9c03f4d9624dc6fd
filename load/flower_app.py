"""A Flower quickstart-style client, written for Flower and nothing else: a NumPyClient training
a PyTorch MLP on one partition of scikit-learn's digits (the Micro-FL demo's model and shards).

Micro-FL runs it unchanged (README "Flower clients"; needs flwr, torch and scikit-learn):

    microfl flower-client --url URL --token TOKEN --app flower_app:client_fn --app-dir load \
        --node-config "partition-id=0 num-partitions=20" [--evaluate]

As in Flower's quickstart, client_fn reads its partition from context.node_config and its
training settings from context.run_config (`--config local-epochs=5` here); fit reads
config["server_round"] to seed its data order, so that a run can be repeated exactly."""

from __future__ import annotations

from collections import OrderedDict
from functools import cache

import torch
from flwr.client import NumPyClient
from torch.utils.data import DataLoader, TensorDataset

from microfl.client.torch import mlp
from microfl.local.demo_data import digits_shards

ALPHA = 0.5  # the demo's non-IID split (Dirichlet alpha) and data seed
DATA_SEED = 0


@cache
def _shards(num_partitions: int) -> tuple:
    shards, test, _ = digits_shards(num_partitions, ALPHA, DATA_SEED)
    return shards, test


def load_data(partition_id: int, num_partitions: int) -> tuple[TensorDataset, TensorDataset]:
    """This client's training partition, and the held-out digits to evaluate on."""
    shards, (x_test, y_test) = _shards(num_partitions)
    x, y = shards[partition_id]
    train = TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    return train, TensorDataset(torch.from_numpy(x_test), torch.from_numpy(y_test))


def train(net, trainloader, epochs: int, lr: float) -> float:
    """SGD on cross-entropy; the last epoch's mean loss."""
    criterion = torch.nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(net.parameters(), lr=lr)
    net.train()
    for _ in range(epochs):
        total = 0.0
        for images, labels in trainloader:
            optimizer.zero_grad()
            loss = criterion(net(images), labels)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(labels)
    return total / len(trainloader.dataset)


def test(net, testloader) -> tuple[float, float]:
    criterion = torch.nn.CrossEntropyLoss(reduction="sum")
    net.eval()
    loss, correct = 0.0, 0
    with torch.no_grad():
        for images, labels in testloader:
            outputs = net(images)
            loss += criterion(outputs, labels).item()
            correct += (outputs.argmax(1) == labels).sum().item()
    return loss / len(testloader.dataset), correct / len(testloader.dataset)


def get_weights(net) -> list:
    return [val.cpu().numpy() for _, val in net.state_dict().items()]


def set_weights(net, parameters) -> None:
    params_dict = zip(net.state_dict().keys(), parameters, strict=True)
    state_dict = OrderedDict({k: torch.tensor(v) for k, v in params_dict})
    net.load_state_dict(state_dict, strict=True)


class FlowerClient(NumPyClient):
    def __init__(self, partition_id, trainset, testset, local_epochs, lr, batch_size):
        self.net = mlp()
        self.partition_id = partition_id
        self.trainset, self.testset = trainset, testset
        self.local_epochs, self.lr, self.batch_size = local_epochs, lr, batch_size

    def get_parameters(self, config):
        return get_weights(self.net)

    def fit(self, parameters, config):
        set_weights(self.net, parameters)
        order = torch.Generator().manual_seed(
            DATA_SEED * 1_000_003 + int(config["server_round"]) * 1_009 + self.partition_id
        )
        trainloader = DataLoader(
            self.trainset, batch_size=self.batch_size, shuffle=True, generator=order
        )
        train_loss = train(self.net, trainloader, self.local_epochs, self.lr)
        return get_weights(self.net), len(self.trainset), {"train_loss": train_loss}

    def evaluate(self, parameters, config):
        set_weights(self.net, parameters)
        loss, accuracy = test(self.net, DataLoader(self.testset, batch_size=256))
        return loss, len(self.testset), {"accuracy": accuracy}


def client_fn(context):
    partition_id = int(context.node_config["partition-id"])
    num_partitions = int(context.node_config["num-partitions"])
    trainset, testset = load_data(partition_id, num_partitions)
    run = context.run_config
    return FlowerClient(
        partition_id,
        trainset,
        testset,
        local_epochs=int(run.get("local-epochs", 5)),
        lr=float(run.get("lr", 0.2)),
        batch_size=int(run.get("batch-size", 16)),
    ).to_client()
