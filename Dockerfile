# Build stage: native modules (better-sqlite3, the SEEK_HOLE addon) need a toolchain.
FROM node:20-bookworm-slim AS build
RUN apt-get update && apt-get install -y --no-install-recommends python3 make g++ && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY package.json package-lock.json binding.gyp tsconfig.json tsconfig.build.json ./
COPY native ./native
RUN npm ci
COPY src ./src
COPY scripts ./scripts
COPY openapi.yaml ./
RUN npm run build && npm prune --omit=dev

# Runtime stage: no toolchain, non-root, data in a volume.
FROM node:20-bookworm-slim
WORKDIR /app
COPY --from=build /app/node_modules ./node_modules
COPY --from=build /app/build/Release/seek_hole.node ./build/Release/seek_hole.node
COPY --from=build /app/dist ./dist
COPY package.json openapi.yaml ./
RUN mkdir -p /data && chown node:node /data
USER node
VOLUME ["/data"]
EXPOSE 8080
ENV DISKPORT_HOST=0.0.0.0 DISKPORT_PORT=8080 DISKPORT_DATA_DIR=/data
# Listening beyond loopback needs a token: docker run -e DISKPORT_TOKEN=... -p 8080:8080 -v diskport:/data diskport
CMD ["node", "dist/main.js"]
