FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p pgsplit

FROM debian:bookworm-slim
COPY --from=build /src/target/release/pgsplit /usr/local/bin/pgsplit
USER nobody
ENTRYPOINT ["/usr/local/bin/pgsplit"]
