#!/usr/bin/env node
// Generates src/openapi.ts, the request and response types, from ../../docs/openapi.json, so
// the client's types are the wire contract's and cannot drift from it.
//
//   node scripts/generate-types.mjs           write src/openapi.ts
//   node scripts/generate-types.mjs --check   exit 1 if src/openapi.ts is not what it would write
//
// Covers the OpenAPI 3.0 subset the document uses: $ref, allOf, enum, nullable, object
// (properties, required, additionalProperties as a map), array (items), string, integer,
// number, boolean. Zero dependencies.
import { readFileSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const documentPath = join(here, "..", "..", "..", "docs", "openapi.json");
const outputPath = join(here, "..", "src", "openapi.ts");

function comment(text, indent) {
  if (!text) return "";
  const lines = text.replace(/\*\//g, "*\\/").split("\n");
  return `${indent}/**\n${lines.map((line) => `${indent} * ${line}`.trimEnd()).join("\n")}\n${indent} */\n`;
}

function typeOf(schema, indent) {
  let type;
  if (schema.$ref) {
    type = schema.$ref.split("/").pop();
  } else if (schema.allOf) {
    type = schema.allOf.map((part) => typeOf(part, indent)).join(" & ");
  } else if (schema.enum) {
    type = schema.enum.map((value) => JSON.stringify(value)).join(" | ");
  } else if (schema.type === "object") {
    type = objectType(schema, indent);
  } else if (schema.type === "array") {
    const item = typeOf(schema.items, indent);
    type = /[ |&]/.test(item) ? `Array<${item}>` : `${item}[]`;
  } else if (schema.type === "integer" || schema.type === "number") {
    type = "number";
  } else if (schema.type === "string" || schema.type === "boolean") {
    type = schema.type;
  } else {
    throw new Error(`unsupported schema: ${JSON.stringify(schema)}`);
  }
  return schema.nullable ? `${type} | null` : type;
}

function objectType(schema, indent) {
  const required = new Set(schema.required ?? []);
  const inner = `${indent}  `;
  const members = Object.entries(schema.properties ?? {}).map(
    ([name, property]) =>
      `${comment(property.description, inner)}${inner}${name}${required.has(name) ? "" : "?"}: ${typeOf(property, inner)};`,
  );
  const extra = schema.additionalProperties;
  if (extra !== undefined && extra !== false && extra !== true) {
    // A map (e.g. policy.projects: name -> limits): an index signature.
    members.push(`${inner}[name: string]: ${typeOf(extra, inner)};`);
  }
  return `{\n${members.join("\n")}\n${indent}}`;
}

export function generate(document) {
  const parts = [
    "// Generated from docs/openapi.json by scripts/generate-types.mjs: do not edit.",
    "// `npm run generate` rewrites it; `npm test` fails while it is out of date.",
    `// ${document.info.title} ${document.info.version}`,
  ];
  for (const [name, schema] of Object.entries(document.components.schemas)) {
    parts.push(`\n${comment(schema.description, "")}export type ${name} = ${typeOf(schema, "")};`);
  }
  return `${parts.join("\n")}\n`;
}

const document = JSON.parse(readFileSync(documentPath, "utf8"));
const generated = generate(document);
if (process.argv.includes("--check")) {
  let current = "";
  try {
    current = readFileSync(outputPath, "utf8");
  } catch {
    // missing: out of date
  }
  if (current !== generated) {
    console.error("src/openapi.ts is out of date with docs/openapi.json: run `npm run generate`");
    process.exit(1);
  }
  console.log("src/openapi.ts matches docs/openapi.json");
} else {
  writeFileSync(outputPath, generated);
  console.log(`wrote ${outputPath}`);
}
