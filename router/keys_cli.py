"""``llmfleet keys create|list|revoke|admin-token``: manage the gateway's API keys in Redis."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from typing import Any

from proto.defaults import DEFAULT_NAMESPACE
from router.auth import KeyStore


def _emit(args: argparse.Namespace, payload: Any, text: str) -> None:
    print(json.dumps(payload) if args.json else text)


async def _create(store: KeyStore, args: argparse.Namespace) -> int:
    key_id, secret = await store.create(args.name)
    info = next(i for i in await store.list() if i.key_id == key_id)
    _emit(args, {**info.to_json(), "secret": secret},
          f"key_id: {key_id}\nname:   {info.name}\nsecret: {secret}\n"
          "(the secret is shown once and not stored: keep it now)")
    return 0


async def _list(store: KeyStore, args: argparse.Namespace) -> int:
    infos = await store.list()
    rows = [info.to_json() for info in infos]
    lines = [f"{'KEY_ID':<14}{'CREATED':<27}{'STATUS':<9}NAME"]
    lines += [f"{r['key_id']:<14}{r['created']:<27}{'revoked' if r['revoked'] else 'active':<9}"
              f"{r['name']}" for r in rows]
    _emit(args, {"keys": rows}, "\n".join(lines))
    return 0


async def _revoke(store: KeyStore, args: argparse.Namespace) -> int:
    try:
        changed = await store.revoke(args.key_id)
    except KeyError:
        print(f"no key with id {args.key_id}", file=sys.stderr)
        return 1
    _emit(args, {"key_id": args.key_id, "revoked": True, "changed": changed},
          f"revoked {args.key_id}" if changed else f"{args.key_id} was already revoked")
    return 0


async def _admin_token(store: KeyStore, args: argparse.Namespace) -> int:
    if args.rotate:
        token = await store.rotate_admin_token()
        _emit(args, {"admin_token": token, "rotated": True},
              f"admin token (shown once, not stored): {token}")
        return 0
    present = await store.has_admin_token()
    _emit(args, {"admin_token_set": present},
          "an admin token is set (only its hash is stored; --rotate replaces it)" if present
          else "no admin token yet: `llmfleet up` creates one, or use --rotate")
    return 0


def run_keys(args: argparse.Namespace) -> int:
    redis_url = args.redis_url or os.environ.get("REDIS_URL")
    if not redis_url:
        print("no Redis URL: pass --redis-url or set REDIS_URL (`llmfleet up` prints its "
              "redis_url when it starts)", file=sys.stderr)
        return 2

    async def main() -> int:
        async with KeyStore(redis_url, args.namespace) as store:
            return int(await args.keys_func(store, args))

    try:
        return asyncio.run(main())
    except ValueError as exc:
        print(str(exc), file=sys.stderr)
        return 2


def register_cli(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--redis-url", default=None, help="the fleet's Redis (default $REDIS_URL)")
    common.add_argument("--namespace", default=DEFAULT_NAMESPACE, help="the fleet's key prefix")
    common.add_argument("--json", action="store_true", help="print one JSON object")

    keys = subparsers.add_parser("keys", help="manage the gateway's API keys")
    actions = keys.add_subparsers(dest="keys_command", required=True)
    create = actions.add_parser("create", parents=[common], help="create a key (secret shown once)")
    create.add_argument("--name", required=True, help="who or what the key is for")
    create.set_defaults(keys_func=_create)
    listing = actions.add_parser("list", parents=[common], help="list keys (never secrets)")
    listing.set_defaults(keys_func=_list)
    revoke = actions.add_parser("revoke", parents=[common], help="revoke a key by id")
    revoke.add_argument("key_id")
    revoke.set_defaults(keys_func=_revoke)
    admin = actions.add_parser("admin-token", parents=[common],
                               help="whether an admin token is set; --rotate makes a new one")
    admin.add_argument("--rotate", action="store_true")
    admin.set_defaults(keys_func=_admin_token)
    keys.set_defaults(func=run_keys)
