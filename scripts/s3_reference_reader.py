#!/usr/bin/env python3
"""Reference reader for `dualpath bench object`: GETs every object named in a file
with boto3 and a thread pool of the same concurrency, and prints bytes and seconds."""

import argparse
import time
from concurrent.futures import ThreadPoolExecutor

import boto3
from botocore.config import Config


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--bucket", required=True)
    parser.add_argument("--access-key", required=True)
    parser.add_argument("--secret-key", required=True)
    parser.add_argument("--objects", required=True, help="file with one object name per line")
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    names = [line.strip() for line in open(args.objects) if line.strip()]
    s3 = boto3.client(
        "s3",
        endpoint_url=args.endpoint,
        aws_access_key_id=args.access_key,
        aws_secret_access_key=args.secret_key,
        region_name="us-east-1",
        config=Config(max_pool_connections=args.concurrency, s3={"addressing_style": "path"}),
    )

    def fetch(name):
        return len(s3.get_object(Bucket=args.bucket, Key=name)["Body"].read())

    started = time.perf_counter()
    with ThreadPoolExecutor(args.concurrency) as pool:
        total = sum(pool.map(fetch, names))
    print(f"{total} {time.perf_counter() - started:.6f}")


if __name__ == "__main__":
    main()
